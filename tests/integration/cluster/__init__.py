"""The pipeline on a ClickHouse cluster: ZooKeeper and two nodes, in both shapes."""
