"""The DeepSeek-V3 network and what describes it: config, architecture map, tokenizer, MindSpore runtime."""
