"""Scaffolding behind the method, split by concern; a reader of the paper can skip it. It imports nothing from the
repository's root (tests/test_layout.py checks it from the code's imports):

    cli.py          the command line: one parser style, one-line errors for bad input, the device, the hub
    runfolder.py    one run per --output_dir, never written over; what a run wrote
    checkpoints.py  the LoRA's two file formats, atomic checkpoints, exact resume, the final LoRA and its model card
    tracking.py     metrics.jsonl and the trackers, timers, memory figures, stopping with one line
    scoring.py      the reward in the loop: the checked call, the judge's overlap, gathering across ranks
    judges.py       the VLM judge backends (local model, OpenAI-compatible server, the pipeline's text encoder, tiny)
    parallel.py     torchrun's ranks and the few collectives; the frozen weights sharded (--fsdp)
    quantize.py     the frozen blocks in int8 or NF4
    memory.py       a step's GPU memory planned before the run
    images.py       image files and the layered reference format
    pictures.py     panels and grids of candidate decompositions
    report.py       evaluate.py's table, CSV and charts
    layerd.py       LayerD's evaluation protocol
    tiny.py         the offline models of the tests and dry runs; the released configuration with random weights
    openai_server.py  a loopback OpenAI-compatible judge server (tests, bench)
"""
