"""twistd plugin: ``twistd -n dqid --size=N`` runs one dqid node."""

from twisted.application.service import ServiceMaker

dqid = ServiceMaker(
    "dqid",
    "dqid.tap",
    "A bounded, replicated work queue node (HTTP API, AMP replication).",
    "dqid",
)
