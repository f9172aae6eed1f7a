//! The tiny fixture models on the CPU backend, batched every way the engine can batch,
//! against transformers' greedy outputs and logprobs.
