"""Helper libraries of the tests: none of them is a test.

- :mod:`.require`: skip with the reason on a developer machine, fail in CI
  (``XFRMTRACE_REQUIRE_ALL``).
- :mod:`.k8stools`: helm (fetched once) and chart rendering; :mod:`.kubeapi`: a real
  kube-apiserver built once; :mod:`.podspec`: a rendered pod as the VM lab launches it.
- :mod:`.kasm`: machine code assembled by GNU as, for the resolver's tests.
- :mod:`.distbuild`: ``make dist`` once per test run; :mod:`.dockerfile`: the Dockerfile read
  and run in Debian chroots where no container engine works.
"""
