//! allam-tokenizer.
