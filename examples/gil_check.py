"""Does the block checksum (xxhash XXH3) release the GIL? Hash 32 KiB slices (one layer of one
block) from 1 and from 4 threads; with the GIL released the rate scales with threads."""
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dualpath.storage.blockfile import checksum

buf = np.random.default_rng(0).integers(0, 256, 32 << 10, dtype=np.uint8)


def work(n=20000):
    for _ in range(n):
        checksum(buf)


for threads in (1, 4):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda _: work(), range(threads)))
    print(f"{threads} threads: {threads * 20000 * len(buf) / (time.perf_counter() - t0) / 1e9:.1f} GB/s")
