"""Names on both sides of Kubernetes' rules (label keys, extended resource names, label
values), mostly Kubernetes' own test values (apimachinery's validation_test.go), shared by the
offline tests (tests/unit/api/test_names.py, against a port of the API server's checks) and the
e2e tests (tests/e2e/test_crd.py: the CRD and a Pod on a real API server agree on each).
"""

QUALIFIED_GOOD = [
    "simple", "now-with-dashes", "1-starts-with-num", "1234", "simple/simple",
    "now-with-dashes/simple", "now-with-dashes/now-with-dashes", "now.with.dots/now-with-dashes",
    "now-with.dashes-and.dots/now-with-dashes", "now.with.dots/now-with-dashes-and.dots",
    "1-num.2-num/3-num", "1234/5678", "1.2.3.4/5678", "Uppercase_Is_OK_123",
    "example.com/Uppercase_Is_OK_123", "requests.storage-foo", "a" * 63,
    "a" * 253 + "/" + "b" * 63, "node.kubernetes.io/instance-type",
]
QUALIFIED_BAD = [
    "", "nospecialchars%^=@", "cantendwithadash-", "-cantstartwithadash-", "only/one/slash",
    "Example.com/abc", "example_com/abc", "example.com/", "/simple", "a" * 64,
    "a" * 254 + "/abc", "bad key!", "key\n", "a..b/c", "-a.com/b", "a.com-/b",
]
EXTENDED_GOOD = [
    "nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "a/b", "example.com/Big_GPU.v2",
    "a" * 244 + "/" + "b" * 63,
]
NATIVE_RESOURCES = ["gpu", "cpu", "kubernetes.io/gpu", "example.kubernetes.io/gpu"]
"""Not extended resources: unprefixed names and names in kubernetes.io are Kubernetes' own (a
container may still name some of them, e.g. `cpu`, but they are not a device plugin's GPUs)."""
EXTENDED_BAD = [
    *NATIVE_RESOURCES, "GPU Cards!", "requests.example.com/gpu", "a" * 245 + "/b",
    "example.com/" + "b" * 64, "Example.com/gpu", "example.com/gpu/x", "example.com/-gpu", "/gpu",
    "example.com/",
]
LABEL_VALUES = ["", "a", "A-b_c.d", "a" * 63, "a" * 64, "a b", "-a", "a-", "x\n", "ü"]
SECRET_KEYS_GOOD = ["token", "api-key", "API_KEY", ".hidden", "a.b", "-", "_", "a" * 253,
                    ".a..b", "x.."]
"""Keys of a Secret's data (validation.IsConfigMapKey): letters, digits, `-`, `_`, `.`."""
SECRET_KEYS_BAD = ["", ".", "..", "..token", "...", "a/b", "a b", "key\n", "ü", "a" * 254,
                   "a:b"]
