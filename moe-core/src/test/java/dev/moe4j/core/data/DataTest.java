package dev.moe4j.core.data;

import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.List;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class DataTest {
    @TempDir
    Path dir;

    // ------------------------------------------------------------------ loading

    @Test
    void textFileIsTokenizedAndBadFilesAreClearErrors() throws IOException {
        Path f = dir.resolve("c.txt");
        Files.writeString(f, "héllo\n", StandardCharsets.UTF_8);
        assertArrayEquals(new int[] {'h', 0xC3, 0xA9, 'l', 'l', 'o', '\n'}, Datasets.loadText(f, ByteTokenizer.INSTANCE).toArray());

        var nf = assertThrows(NoSuchFileException.class, () -> Datasets.loadText(dir.resolve("none.txt"), ByteTokenizer.INSTANCE));
        assertTrue(nf.getMessage().contains("none.txt"), nf.getMessage());
        Files.write(f, new byte[0]);
        assertError(() -> Datasets.loadText(f, ByteTokenizer.INSTANCE), "c.txt: text corpus is empty");
        Files.write(f, new byte[] {'a', (byte) 0xFF, 'b'});
        assertError(() -> Datasets.loadText(f, ByteTokenizer.INSTANCE), "c.txt: text corpus is not valid UTF-8");
    }

    @Test
    void shardsAreRawLittleEndianUint16ReadAsOneSequence() throws IOException {
        Path a = dir.resolve("a.bin"), b = dir.resolve("b.bin");
        Files.write(a, new byte[] {0x01, 0x00, 0x34, 0x12, (byte) 0xFF, (byte) 0xFF});   // 1, 0x1234, 65535 by hand
        TokenShards.write(b, new int[] {7, 8});
        TokenShards s = Datasets.loadShards(List.of(a, b), 65536);
        assertEquals(5, s.length());
        assertArrayEquals(new int[] {1, 0x1234, 65535, 7, 8}, s.toArray());
        assertEquals(7, s.get(3));   // first token of the second shard
        int[] part = new int[3];
        s.read(2, part, 0, 3);   // across the shard boundary
        assertArrayEquals(new int[] {65535, 7, 8}, part);
        assertThrows(IndexOutOfBoundsException.class, () -> s.get(5));
    }

    @Test
    void badShardsAreClearErrors() throws IOException {
        Path good = dir.resolve("g.bin"), big = dir.resolve("big.bin"), empty = dir.resolve("e.bin"), odd = dir.resolve("o.bin");
        TokenShards.write(good, new int[] {1, 2, 3});
        TokenShards.write(big, new int[] {1, 2, 300, 4});
        Files.write(empty, new byte[0]);
        Files.write(odd, new byte[] {1, 0, 2});
        assertError(() -> TokenShards.open(List.of(good, big), 256), "big.bin: token id 300 at position 2 is >= the vocabulary size 256");
        assertError(() -> TokenShards.open(List.of(empty), 256), "e.bin: token shard is empty");
        assertError(() -> TokenShards.open(List.of(odd), 256), "o.bin: token shard has 3 bytes");
        var nf = assertThrows(NoSuchFileException.class, () -> TokenShards.open(List.of(good, dir.resolve("gone.bin")), 256));
        assertTrue(nf.getMessage().contains("gone.bin"), nf.getMessage());
        assertThrows(IllegalArgumentException.class, () -> TokenShards.open(List.of(good), 70000));
        assertEquals(3, TokenShards.open(List.of(good), 4).length());   // ids up to vocabSize - 1 pass
    }

    // ------------------------------------------------------------------ split

    @Test
    void validationSplitIsTheLastFraction() {
        TokenSequence all = TokenSequence.of(iota(100));
        TrainValSplit s = TrainValSplit.of(all);
        assertEquals(90, s.train().length());
        assertArrayEquals(Arrays.copyOfRange(iota(100), 90, 100), s.val().toArray());
        TrainValSplit q = TrainValSplit.of(TokenSequence.of(iota(10)), 0.25);   // floor(2.5) = 2 held out
        assertArrayEquals(new int[] {8, 9}, q.val().toArray());
        assertEquals(8, q.train().length());
        assertThrows(IllegalArgumentException.class, () -> TrainValSplit.of(all, 1.0));
        assertThrows(IllegalArgumentException.class, () -> TrainValSplit.of(all, -0.1));
        assertThrows(IllegalArgumentException.class, () -> TrainValSplit.of(all, Double.NaN));
    }

    // ------------------------------------------------------------------ sampler

    @Test
    void batchRowsAreCorpusWindowsWithTargetsShiftedByOne() {
        int n = 1000, B = 4, T = 16;
        int[] corpus = iota(n);   // token = its position, so each row reveals where it came from
        BatchSampler s = new BatchSampler(TokenSequence.of(corpus), B, T, 123);
        for (long step = 0; step < 50; step++) {
            Batch b = s.batch(step);
            assertEquals(B, b.batchSize());
            assertEquals(T, b.seqLen());
            for (int r = 0; r < B; r++) {
                int start = b.inputs()[r * T];
                assertTrue(start >= 0 && start + T < n, "row fits with its targets");
                assertEquals(s.start(step, r), start);
                for (int t = 0; t < T; t++) {
                    assertEquals(start + t, b.inputs()[r * T + t]);
                    assertEquals(start + t + 1, b.targets()[r * T + t]);
                }
            }
        }
    }

    @Test
    void aResumedRunDrawsTheSameBatchesAsAnUninterruptedOne() {
        TokenSequence corpus = TokenSequence.of(iota(5000));
        BatchSampler full = new BatchSampler(corpus, 3, 8, 99);
        Batch[] uninterrupted = new Batch[30];
        for (int step = 0; step < 30; step++) uninterrupted[step] = full.batch(step);
        BatchSampler resumed = new BatchSampler(corpus, 3, 8, 99);   // fresh object, as after a restart
        for (int step = 17; step < 30; step++) {
            assertArrayEquals(uninterrupted[step].inputs(), resumed.batch(step).inputs(), "step " + step);
            assertArrayEquals(uninterrupted[step].targets(), resumed.batch(step).targets(), "step " + step);
        }
        assertFalse(Arrays.equals(uninterrupted[5].inputs(), uninterrupted[6].inputs()), "steps differ");
        assertFalse(Arrays.equals(uninterrupted[5].inputs(), new BatchSampler(corpus, 3, 8, 100).batch(5).inputs()), "seeds differ");
    }

    @Test
    void ranksTogetherDrawTheSingleRankGlobalBatch() {
        TokenSequence corpus = TokenSequence.of(iota(3000));
        int B = 2, W = 3, T = 5;
        Batch global = new BatchSampler(corpus, B * W, T, 7).batch(11);
        BatchSampler perRank = new BatchSampler(corpus, B, T, 7);
        for (int r = 0; r < W; r++) {
            Batch mine = perRank.batch(11, r, W);
            assertArrayEquals(Arrays.copyOfRange(global.inputs(), r * B * T, (r + 1) * B * T), mine.inputs(), "rank " + r);
            assertArrayEquals(Arrays.copyOfRange(global.targets(), r * B * T, (r + 1) * B * T), mine.targets(), "rank " + r);
        }
        assertThrows(IllegalArgumentException.class, () -> perRank.batch(0, 3, 3));
        assertThrows(IllegalArgumentException.class, () -> perRank.batch(-1));
    }

    @Test
    void startPositionsAreUniformOverEveryValidPosition() {
        int n = 20, T = 4, positions = n - T;   // starts 0..15 all keep their T targets inside the corpus
        BatchSampler s = new BatchSampler(TokenSequence.of(iota(n)), 8, T, 2024);
        long[] hits = new long[positions];
        int draws = 0;
        for (long step = 0; step < 500; step++) {
            Batch b = s.batch(step);
            for (int r = 0; r < 8; r++, draws++) hits[b.inputs()[r * T]]++;
        }
        double expected = (double) draws / positions, chi2 = 0;
        for (long h : hits) {
            assertTrue(h > 0, "every start position is drawn");
            chi2 += (h - expected) * (h - expected) / expected;
        }
        assertTrue(chi2 < 37.7, "chi-square " + chi2 + " with 15 degrees of freedom (p = 0.001 bound 37.7)");
    }

    @Test
    void corpusShorterThanOneSequenceIsAClearError() {
        assertError(() -> new BatchSampler(TokenSequence.of(iota(8)), 1, 8, 0), "training corpus has 8 tokens, fewer than seqLen + 1 = 9");
        Batch only = new BatchSampler(TokenSequence.of(iota(9)), 2, 8, 0).batch(3);   // exactly T + 1: only start 0
        assertArrayEquals(Arrays.copyOfRange(iota(9), 1, 9), Arrays.copyOfRange(only.targets(), 8, 16));
        assertError(() -> new BatchSampler(TokenSequence.of(iota(50)), 0, 8, 0), "batchSize must be > 0");
        assertError(() -> new BatchSampler(TokenSequence.of(iota(50)), 1, 0, 0), "seqLen must be > 0");
    }

    // ------------------------------------------------------------------ validation

    @Test
    void validationBatchesCoverTheHeldOutTokensInOrder() {
        int n = 101, B = 3, T = 10;   // (101 - 1) / 10 = 10 windows -> 3 whole batches, 9 windows
        ValidationBatches v = new ValidationBatches(TokenSequence.of(iota(n)), B, T);
        assertEquals(3, v.numBatches());
        assertEquals(90, v.tokensCovered());
        int window = 0;
        for (Batch b : v) {
            for (int r = 0; r < B; r++, window++) {
                for (int t = 0; t < T; t++) {
                    assertEquals(window * T + t, b.inputs()[r * T + t]);
                    assertEquals(window * T + t + 1, b.targets()[r * T + t]);
                }
            }
        }
        assertEquals(9, window);
        assertArrayEquals(v.batch(1).inputs(), v.batch(1).inputs(), "fixed order");
        assertError(() -> new ValidationBatches(TokenSequence.of(iota(30)), 3, 10), "validation split has 30 tokens, fewer than batchSize * seqLen + 1 = 31");
        assertEquals(1, new ValidationBatches(TokenSequence.of(iota(31)), 3, 10).numBatches());
    }

    // ------------------------------------------------------------------ corpus and baselines

    @Test
    void defaultCorpusIsTinyShakespeare() {
        String text = Corpora.defaultCorpus();
        assertEquals(1_115_394, text.length());
        assertTrue(text.startsWith("First Citizen:\nBefore we proceed any further, hear me speak."));
        int[] tokens = ByteTokenizer.INSTANCE.encode(text);
        assertEquals(text.length(), tokens.length, "plain ASCII");
        assertEquals(65, Arrays.stream(tokens).distinct().count(), "the well-known 65 distinct characters");
        double h = Corpora.unigramEntropy(tokens);
        assertTrue(h > 2.5 && h < Math.log(65), "character unigram entropy " + h);
    }

    @Test
    void unigramEntropyMatchesClosedForms() {
        // k symbols, each equally often: ln k.
        int[] uniform = new int[7 * 13];
        for (int i = 0; i < uniform.length; i++) uniform[i] = 100 + i % 7;
        assertEquals(Math.log(7), Corpora.unigramEntropy(uniform), 1e-12);
        // p = (1/2, 1/4, 1/4): 1.5 ln 2.
        assertEquals(1.5 * Math.log(2), Corpora.unigramEntropy(new int[] {5, 5, 3, 9, 5, 3, 9, 5}), 1e-12);
        assertEquals(0, Corpora.unigramEntropy(new int[] {4, 4, 4}), 0);
        assertThrows(IllegalArgumentException.class, () -> Corpora.unigramEntropy(new int[0]));
    }

    @Test
    void unigramCrossEntropyIsAddOneSmoothed() {
        // train counts (2, 2) over 2 tokens: p(0) = 3/6.
        assertEquals(Math.log(2), Corpora.unigramCrossEntropy(TokenSequence.of(new int[] {0, 0, 1, 1}), TokenSequence.of(new int[] {0}), 2), 1e-12);
        // unseen token in a vocabulary of 4 after 4 training tokens: p = 1/8.
        assertEquals(Math.log(8), Corpora.unigramCrossEntropy(TokenSequence.of(new int[] {0, 0, 0, 1}), TokenSequence.of(new int[] {2}), 4), 1e-12);
        assertThrows(IllegalArgumentException.class,
                () -> Corpora.unigramCrossEntropy(TokenSequence.of(new int[] {0, 5}), TokenSequence.of(new int[] {0}), 4));
    }

    // ------------------------------------------------------------------ helpers

    private static int[] iota(int n) {
        int[] a = new int[n];
        for (int i = 0; i < n; i++) a[i] = i;
        return a;
    }

    private interface Action { void run() throws Exception; }

    private static void assertError(Action a, String expected) {
        Exception e = assertThrows(Exception.class, a::run);
        assertTrue(e.getMessage() != null && e.getMessage().contains(expected), "expected '" + expected + "' in: " + e.getMessage());
    }
}
