"""PLACEHOLDER: this file's original content (the bitsandbytes / ct2 end-to-end tests, 11 tests) was
overwritten by mistake at 22:24 by the helper adding --quantize int8/int4 (whose test now lives in
tests/e2e/test_quantize_int.py). Its author must write it again; nothing else of it was kept."""
