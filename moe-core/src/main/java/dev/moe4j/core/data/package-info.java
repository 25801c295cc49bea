/**
 * Training data: tokenizers ({@link dev.moe4j.core.data.ByteTokenizer}, {@link dev.moe4j.core.data.Gpt2BpeTokenizer}),
 * token sequences from text or uint16 shards ({@link dev.moe4j.core.data.Datasets}), the train/validation split,
 * the deterministic (seed, step) batch sampler, validation batches, and the bundled default corpus with its
 * unigram baselines ({@link dev.moe4j.core.data.Corpora}).
 */
package dev.moe4j.core.data;
