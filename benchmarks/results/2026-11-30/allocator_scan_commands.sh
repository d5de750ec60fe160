#!/bin/bash
# run train_bench openft-only full FT under several allocators, sequentially
cd /work/main
L=/tmp/alloc/usr/lib/x86_64-linux-gnu
run() { name=$1; shift; env "$@" OPENFT_HOME=.openft-home timeout 900 .venv/bin/python benchmarks/train_bench.py --method full --configs openft --json > /work/notes/s9/$name.json 2> /work/notes/s9/$name.err; echo "$name done $(date +%T)" >> /work/notes/s9/progress; }
run glibc X=1
run tc LD_PRELOAD=$L/libtcmalloc_minimal.so.4
run je_bg LD_PRELOAD=$L/libjemalloc.so.2 MALLOC_CONF=background_thread:true,dirty_decay_ms:30000,muzzy_decay_ms:30000
run je_nodecay LD_PRELOAD=$L/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
#!/bin/bash
cd /work/main
L=/tmp/alloc/usr/lib/x86_64-linux-gnu
run() { name=$1; m=$2; shift 2; env "$@" OPENFT_HOME=.openft-home timeout 900 .venv/bin/python benchmarks/train_bench.py --method $m --configs openft --json > /work/notes/s9/$name.json 2> /work/notes/s9/$name.err; echo "$name done $(date +%T)" >> /work/notes/s9/progress; }
run tc2 full LD_PRELOAD=$L/libtcmalloc_minimal.so.4
run lora_glibc lora X=1
run lora_tc lora LD_PRELOAD=$L/libtcmalloc_minimal.so.4
# je_default (first): LD_PRELOAD=$L/libjemalloc.so.2 (no MALLOC_CONF), same train_bench command
