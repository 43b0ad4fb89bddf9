#!/bin/sh
# timeout: 120
# Scenario 2: `xenbackd selftest` on the real /dev/xen/evtchn, gntdev and
# gntalloc of dom0 (and xenstore). It prints PASS/FAIL lines and exits
# non-zero on failure; this wrapper also demands at least one PASS line and
# no FAIL line, so an empty or silent self-test cannot pass.
/test/xenbackd selftest > /tmp/selftest.out 2>&1
rc=$?
cat /tmp/selftest.out
if grep -q 'unknown command' /tmp/selftest.out; then
    echo "FAIL selftest: this xenbackd has no \`selftest\` command"; exit 1
fi
np=$(grep -c '^PASS' /tmp/selftest.out); nf=$(grep -c '^FAIL' /tmp/selftest.out)
echo "selftest: rc=$rc, $np PASS lines, $nf FAIL lines"
if [ "$rc" = 0 ] && [ "$np" -gt 0 ] && [ "$nf" = 0 ]; then echo "PASS selftest"; exit 0; fi
echo "FAIL selftest"
exit 1
