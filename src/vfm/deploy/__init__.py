"""Checks of what vfm deploys, run by the test suite (tests/deploy) and usable from a shell: the
kustomize manifests render offline (`render`), every rendered object validates against its published
schema for the stated Kubernetes version (`validate`, `crd_schemas`), and every pod template meets the
Pod Security `restricted` standard (`policy`). Nothing at run time imports this package.
"""
