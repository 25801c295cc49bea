package dev.moe4j.examples;

import dev.moe4j.core.data.Batch;
import dev.moe4j.core.data.BatchSampler;
import dev.moe4j.core.data.ByteTokenizer;
import dev.moe4j.core.data.Corpora;
import dev.moe4j.core.data.Datasets;
import dev.moe4j.core.data.Gpt2BpeTokenizer;
import dev.moe4j.core.data.TokenSequence;
import dev.moe4j.core.data.Tokenizer;
import dev.moe4j.core.data.TrainValSplit;
import dev.moe4j.core.data.ValidationBatches;
import dev.moe4j.core.train.BatchSource;

import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/** Turns the trainer's data options into a tokenized train/validation split and a {@link BatchSource}. */
final class DataSetup {
    private DataSetup() {}

    /**
     * @param unigramEntropy cross-entropy (nats) of the validation tokens under the training tokens' unigram
     *                       distribution: the loss a model that ignores context reaches, the bar to beat
     */
    record Prepared(BatchSource source, int vocabSize, long trainTokens, long validationTokens, double unigramEntropy, String description) {}

    static Prepared prepare(Path text, List<Path> shards, Path vocab, Path merges, int shardVocab, int batchSize, int seqLen,
                            int microBatches, long seed) throws IOException {
        TokenSequence all;
        int vocabSize;
        String description;
        if (shards != null && !shards.isEmpty()) {
            all = Datasets.loadShards(shards, shardVocab);
            vocabSize = shardVocab;
            description = "uint16 shards " + shards;
        } else {
            Tokenizer tok = vocab != null ? Gpt2BpeTokenizer.load(vocab, merges) : ByteTokenizer.INSTANCE;
            vocabSize = tok.vocabSize();
            if (text != null) {
                all = Datasets.loadText(text, tok);
                description = text.getFileName() + (vocab != null ? " (GPT-2 BPE)" : " (bytes)");
            } else {
                all = Datasets.fromText(Corpora.defaultCorpus(), tok);
                description = "tiny Shakespeare (bytes)" + (vocab != null ? " (GPT-2 BPE)" : "");
            }
        }
        TrainValSplit split = TrainValSplit.of(all);
        BatchSampler sampler = new BatchSampler(split.train(), batchSize, seqLen, seed);
        ValidationBatches val = new ValidationBatches(split.val(), batchSize, seqLen);
        double unigram = Corpora.unigramCrossEntropy(split.train(), split.val(), vocabSize);
        BatchSource source = new BatchSource() {
            @Override public Batch train(int step, int micro) {
                return sampler.batch((long) step * microBatches + micro);
            }

            @Override public List<Batch> validation(int maxBatches) {
                List<Batch> list = new ArrayList<>();
                for (int i = 0; i < Math.min(maxBatches, val.numBatches()); i++) list.add(val.batch(i));
                return list;
            }
        };
        return new Prepared(source, vocabSize, split.train().length(), split.val().length(), unigram, description);
    }
}
