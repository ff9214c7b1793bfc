#!/bin/sh
# The browser test (tests/test_report.py) opens a report in headless Chromium. Install Debian's `chromium`
# when it is missing and apt-get can (root or passwordless sudo); otherwise say why that test will skip.
# Never fails: the rest of the suite runs either way.
for b in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
skip="tests/test_report.py's browser test will skip"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no chromium and no apt-get: $skip (install a Chromium to run it)" >&2; exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
else echo "no chromium, and apt-get needs root: $skip (apt-get install chromium to run it)" >&2; exit 0
fi
echo "installing chromium with apt-get (for the browser test)" >&2
$SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
  || echo "apt-get could not install chromium: $skip" >&2
exit 0
