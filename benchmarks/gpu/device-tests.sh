#!/bin/bash
# Sourced by the device calls after install.sh: the device-marked tests (tests/test_device.py).
echo "=== device-marked tests"; date
timeout 150 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -m device \
  tests/test_device.py 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error" | tail -30
