"""Every behavioural test runs against a real etcd from etcd_rdzv.testing."""

pytest_plugins = ["etcd_rdzv.testing.fixtures"]
