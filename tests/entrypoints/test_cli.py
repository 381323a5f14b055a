import subprocess
import sys


def test_generate_default_model_offline():
    """`pagedserve generate` with no model completes the capital of France on the bundled model."""
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.cli", "generate", "--max-tokens", "8", "--num-kv-blocks", "32"],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert "Paris" in result.stdout


def test_generate_bad_model_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.cli", "generate", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "not a local path" in result.stderr


def test_serve_help_documents_vllm_flags():
    result = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    flags = ["--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--dtype", "--block-size",
             "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory-bytes", "--enable-prefix-caching",
             "--no-enable-prefix-caching", "--seed", "--chat-template", "--max-waiting-requests",
             "--engine-placement"]
    for flag in flags:
        assert flag in result.stdout
    help_text = " ".join(result.stdout.split())
    assert "most tokens in one step" in help_text and "tokens per KV-cache block" in help_text
