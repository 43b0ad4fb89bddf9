#!/bin/sh
# timeout: 60
# The harness's own check, independent of xenbackd: raw xenstore (xenbus and
# socket), an evtchn loopback and a gntalloc->gntdev self-map from a static
# Rust binary (smoke/xensmoke.rs).
exec /test/xensmoke
