"""Helpers of the deployment tests (tests/test_deploy_*.py): host tools, Debian rootfs
tarballs, image builds and container runs, and the probe that runs inside systemd-nspawn."""
