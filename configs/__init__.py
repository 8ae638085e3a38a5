"""Default compression configs, one YAML per method (installed as vllm_kvcomp.configs)."""
