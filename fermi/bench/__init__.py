"""`fermi bench`: measure fermi beside peer engines on the same checkpoint, in one run.

The orchestrator (fermi's own interpreter) prepares each engine's model files, then starts one
subprocess per measurement with that engine's interpreter (`.nox/bench_<peer>/bin/python`), so
peers with conflicting pins never share a process. Parent and worker talk through two JSON
files: a spec in, a result out.

    orchestrator.py   the run: engines, subprocesses, the fermi OpenAI-server load, the outputs
    worker.py         the subprocess side: load, warm up, time TTFT and decode, report RSS
    engines/          one small adapter per engine: prepare, load, greedy token stream
    bandwidth.py      the machine's memory read bandwidth: the decode ceiling
    weights.py        bytes of weights read per decoded token, from an ONNX graph
    report.py         markdown table, JSON and PNG chart

Modules imported by a worker use the standard library only at import time: peers' venvs do not
have fermi's dependencies, only the repository on PYTHONPATH."""
