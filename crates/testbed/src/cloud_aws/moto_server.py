"""moto in server mode for the aws-vpc tests, plus two things the real EC2 API has and moto lacks:
a route whose target network interface is gone is in state `blackhole` (moto reports every route
`active`), and DescribeRouteTables understands the `route.state` filter.

Usage: moto_server.py -H <ip> -p <port>   (the arguments of `moto_server`)
"""
import sys

from moto.ec2.models import route_tables as _rt


def _route_state(self):
    eni = self.interface
    if eni is not None and eni.id not in self.route_table.ec2_backend.enis:
        return "blackhole"
    return "active"


_rt.Route.state = property(_route_state)

_filter_value = _rt.RouteTable.get_filter_value


def _get_filter_value(self, filter_name, method_name=None):
    if filter_name == "route.state":
        return [r.state for r in self._routes.values()]
    return _filter_value(self, filter_name, method_name)


_rt.RouteTable.get_filter_value = _get_filter_value

from moto.server import main  # noqa: E402  (after the patches)

main(sys.argv[1:])
