"""The eviction engine: vLLM extension classes (spec/manager, scheduler, worker, attention backend)."""
