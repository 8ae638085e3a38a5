"""Quality evaluation, random models and plots, run from a checkout (not installed with the plugin).

  python -m evaluation --backend hf|vllm --model DIR [...]   quality vs full KV on RULER-style tasks
  python -m evaluation.pick RESULTS.json --candidates a,b    the candidate a fixed rule picks

  __main__.py      the command line (docs/BENCHMARKS.md)
  suite.py         the configurations: methods and presets (by name) at every budget
  hf_backend.py    CPU path: transformers + the plugin's scorer, planner and eviction as masks
  vllm_backend.py  GPU path: the real engine, every method and budget as per-request overrides
  report.py        aggregation, bootstrap intervals, the markdown table
  decision.py      paired deltas vs uniform and issue #13's acceptance rule
  output.py        the result files (JSON schema, markdown, plots); --resume
  pick.py          the candidate picker
  plots.py         every plot (quality and throughput)
  random_model.py  random-weight Llama-shaped models and a word tokenizer (benchmarks, GPU tests)

The sample documents are the plugin's own (`vllm_kvcomp/calibration_data.py`, shared with
`vllm-kvcomp calibrate`).
"""
