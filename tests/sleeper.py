"""A stand-in worker process for pool tests: takes the worker's arguments, waits for SIGTERM."""

import signal
import sys
import time

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)
