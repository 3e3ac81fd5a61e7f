"""Image input: decoding with limits, the guarded URL fetcher and pixel budgets."""
