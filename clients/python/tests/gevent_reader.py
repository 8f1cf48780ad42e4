"""Run by tests/test_gevent.py in its own process (gevent patches the whole
process): the client under gevent with gRPC's gevent support enabled."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import gevent  # noqa: E402
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

from herald import Client, NearConfig  # noqa: E402


def main() -> None:
    client = Client(sys.argv[1], "token-0123456789abcdef", near=NearConfig(tenants=["acme"]))
    assert client.wait_live(10), "the near cache never became live under gevent"
    first = client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer
    jobs = [
        gevent.spawn(lambda: client.get_resource_result("user_by_slug", ["alice"], tenant="acme").layer)
        for _ in range(20)
    ]
    gevent.joinall(jobs, timeout=10)
    print(first, ",".join(sorted({str(j.value) for j in jobs})))
    client.close()


if __name__ == "__main__":
    main()
