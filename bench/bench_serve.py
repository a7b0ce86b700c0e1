"""Serving a miner: `roadwork serve` against `mlflow models serve` on the same bundle, over loopback.

The bundle: dinov2_small size (ViT-S/14), random init, 224 px views, 10 views (global + 3x3 tiles),
what the bundle asset exports. The request: one validator-style image (224x224 JPEG at PIL's
default quality, base64), as the synapse carries it. For each server: cold start (process spawn to
the first answered request), then p50 / p99 latency per request and throughput at 1 and 4
concurrent clients, each configuration bounded in requests and seconds. Configurations alternate
between the servers (roadwork 1, mlflow 1, mlflow 4, roadwork 4) so neither always runs warmer.
Also the cold `roadwork predict --answer` on one base64 image, the path a miner without a warm
process pays per query. The validator waits 9 s for an answer.

    python -m bench.bench_serve [--requests 20] [--max-seconds 90] [--preset dinov2_small]
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.bench_bundle import build_bundle, street_like_jpegs
from bench.common import machine_facts, write_result

VALIDATOR_TIMEOUT_S = 9.0
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validator_jpeg_b64(seed: int) -> str:
    """224x224, re-encoded at PIL's default quality (what the validator's base64 JPEG is)."""
    import io

    import PIL.Image

    img = PIL.Image.open(io.BytesIO(street_like_jpegs(1, seed=seed)[0]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """One server process: how to start it, how to ask it one image, and when it is ready."""

    def __init__(self, name: str, cmd: list[str], path: str, body, parse, env: dict):
        self.name, self.cmd, self.path, self.body, self.parse, self.env = name, cmd, path, body, parse, env
        self.port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else int(cmd[cmd.index("-p") + 1])
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.proc: subprocess.Popen | None = None

    def ask(self, client: httpx.Client, image_b64: str) -> float:
        r = client.post(self.url, json=self.body(image_b64))
        r.raise_for_status()
        answer = self.parse(r.json())
        if not 0.0 <= answer <= 1.0:
            raise ValueError(f"{self.name} answered {answer}")
        return answer

    def start(self, image_b64: str, timeout: float) -> float:
        """Spawn; seconds until the first request is answered (cold start)."""
        t0 = time.perf_counter()
        self.log = Path(tempfile.mkstemp(prefix="roadwork-bench-serve-", suffix=".log")[1])
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with httpx.Client(timeout=60) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}: {' '.join(self.cmd)}\n"
                        f"{self.log.read_text(errors='replace')[-3000:]}"
                    )
                try:
                    self.ask(client, image_b64)
                    return time.perf_counter() - t0
                except (httpx.HTTPError, ValueError, KeyError):
                    time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        if getattr(self, "log", None):
            self.log.unlink(missing_ok=True)  # kept only while it may explain a failed start


def load(server: Server, images: list[str], clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` threads, each sending up to `requests` requests back to back, for at most `max_seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def run(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            for i in range(requests):
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    server.ask(client, images[(k + i) % len(images)])
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    with lock:
                        errors.append(repr(err))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {
        "server": server.name,
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 4) if wall > 0 else None,
        "p50_seconds": round(float(np.percentile(lat, 50)), 4) if len(lat) else None,
        "p99_seconds": round(float(np.percentile(lat, 99)), 4) if len(lat) else None,
        "max_seconds": round(float(lat.max()), 4) if len(lat) else None,
        "mean_seconds": round(float(lat.mean()), 4) if len(lat) else None,
    }


def save_mlflow_model(bundle_dir: Path, out: Path) -> Path:
    """The pyfunc model the evaluation_report asset registers (from code; nothing pickled), saved locally."""
    import mlflow.pyfunc

    import roadwork_core
    from roadwork_core.bundle import mlflow_pyfunc

    mlflow.pyfunc.save_model(
        str(out),
        python_model=mlflow_pyfunc.__file__,
        artifacts={"bundle": str(bundle_dir)},
        code_paths=[str(Path(roadwork_core.__file__).parent)],
        pip_requirements=["torch", "timm", "safetensors", "pillow", "pandas", "numpy", "scipy", "pydantic"],
    )
    return out


def cold_predict(bundle_dir: Path, image_b64: str, env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("roadwork")), "predict", "--answer", "--bundle", str(bundle_dir)],
        input=image_b64 + "\n", capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    float(done.stdout.strip())
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="dinov2_small")
    parser.add_argument("--requests", type=int, default=20, help="requests per client and configuration")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time bound per configuration")
    parser.add_argument("--start-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    facts = machine_facts()
    # `mlflow models serve` runs `uvicorn` from PATH: the environment's bin must be on it (an activated venv)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OMP_NUM_THREADS", None)  # servers use every core, as a miner would
    images = [_validator_jpeg_b64(seed) for seed in range(8)]
    with tempfile.TemporaryDirectory(prefix="roadwork-bench-serve-") as tmp:
        bundle_dir = build_bundle(args.preset, Path(tmp))
        model_dir = save_mlflow_model(bundle_dir, Path(tmp) / "mlflow_model")
        roadwork = Server(
            "roadwork serve",
            [str(Path(sys.executable).with_name("roadwork")), "serve", "--bundle", str(bundle_dir),
             "--port", str(_free_port())],
            "/predict", lambda b64: {"image": b64}, lambda doc: doc["answer"], env,
        )  # fmt: skip
        mlflow = Server(
            "mlflow models serve",
            [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", str(model_dir),
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(_free_port()), "-w", "1"],
            "/invocations", lambda b64: {"dataframe_records": [{"image_b64": b64}]},
            lambda doc: doc["predictions"][0]["answer"], env,
        )  # fmt: skip
        cold_cli = cold_predict(bundle_dir, images[0], env)
        print(f"[bench_serve] cold `roadwork predict --answer` on one image: {cold_cli:.1f}s")
        runs, cold = [], {}
        try:
            for server in (roadwork, mlflow):
                cold[server.name] = round(server.start(images[0], args.start_timeout), 3)
                print(f"[bench_serve] {server.name}: cold start to first answer {cold[server.name]:.1f}s")
            for server, clients in ((roadwork, 1), (mlflow, 1), (mlflow, 4), (roadwork, 4)):
                load(server, images, clients, 2, args.max_seconds)  # warm-up, not recorded
                r = load(server, images, clients, args.requests if clients == 1 else max(1, args.requests // 2),
                         args.max_seconds)  # fmt: skip
                print(
                    f"[bench_serve] {server.name}, {clients} client(s): {r['requests']} requests, p50 "
                    f"{r['p50_seconds']}s, p99 {r['p99_seconds']}s, {r['throughput_rps']} req/s, {r['errors']} errors"
                )
                runs.append(r)
        finally:
            roadwork.stop()
            mlflow.stop()

    def pick(name: str, clients: int) -> dict:
        return next(r for r in runs if r["server"] == name and r["clients"] == clients)

    rw4, ml4 = pick("roadwork serve", 4), pick("mlflow models serve", 4)
    ratio = (
        rw4["throughput_rps"] / ml4["throughput_rps"]
        if rw4["throughput_rps"] and ml4["throughput_rps"]
        else None
    )
    write_result(
        "serve",
        {
            "benchmark": "serving",
            "what": "p50 / p99 per request and throughput of roadwork serve and mlflow models serve on the same "
            "bundle at 1 and 4 concurrent clients, loopback; cold starts; the validator waits 9 s",
            "preset": args.preset,
            "bundle": "random init, 224 px views, 10 views (global + 3x3 tiles)",
            "request": "one 224x224 JPEG (PIL default quality), base64",
            "cold_start_seconds": cold,
            "cold_roadwork_predict_seconds": round(cold_cli, 3),
            "runs": runs,
            "throughput_ratio_roadwork_over_mlflow_4_clients": round(ratio, 4) if ratio else None,
            "validator_timeout_seconds": VALIDATOR_TIMEOUT_S,
            "roadwork_p99_4_clients_within_validator_timeout": bool(
                rw4["p99_seconds"] is not None and rw4["p99_seconds"] <= VALIDATOR_TIMEOUT_S
            ),
            "met": bool(rw4["p99_seconds"] is not None and rw4["p99_seconds"] <= VALIDATOR_TIMEOUT_S),
            "p50_p99_summary": {
                f"{r['server']} x{r['clients']}": [r["p50_seconds"], r["p99_seconds"]] for r in runs
            },
            "machine": facts,
            "note": "run on the shared 2-core machine while other sessions were busy (see load_average)",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
