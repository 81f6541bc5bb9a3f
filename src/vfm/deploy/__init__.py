"""Checks of what vfm deploys, run by the test suite (tests/deploy) and usable from a shell: the
kustomize manifests render offline (`render`), every rendered object validates against its published
schema for the stated Kubernetes version (`validate`, `crd_schemas`), and every pod template meets the
Pod Security `restricted` standard (`policy`); `preflight` (`vfm preflight`) puts them together with the
compiled pipeline and the jobs the launcher would build, offline and against a live cluster. Nothing in a
pipeline step or a training pod imports this package.
"""
