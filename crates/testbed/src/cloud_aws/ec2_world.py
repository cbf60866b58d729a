"""The aws-vpc tests' view of the cloud, through boto3 (the real AWS client keeps moto honest).

  ec2_world.py setup '<json>'   builds the world, then turns moto's signature checks on;
                                prints ids and credentials as JSON
  ec2_world.py dump             route tables and network interfaces as JSON (admin credentials
                                from the environment)
  ec2_world.py call SERVICE METHOD '<json kwargs>'   one boto3 call, its answer as JSON

The endpoint and region come from AWS_ENDPOINT_URL and AWS_DEFAULT_REGION.
"""
import json
import os
import sys
import urllib.request

import boto3

ENDPOINT = os.environ["AWS_ENDPOINT_URL"]


def client(service, creds=None):
    kw = {"endpoint_url": ENDPOINT}
    if creds:
        kw.update(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds.get("SessionToken"),
        )
    return boto3.client(service, **kw)


def allow(actions):
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
    )


def user_keys(iam, name, actions):
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=allow(actions))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AccessKeyId": k["AccessKeyId"], "SecretAccessKey": k["SecretAccessKey"]}


def setup(args):
    """args: {"hosts": ["192.168.100.11", ...], "vpc_cidr", "subnet_cidr", "other_ip",
    "doomed_ip", "inside_blackhole", "outside_blackhole", "inside_active", "outside_active"}"""
    iam = client("iam")
    admin = user_keys(iam, "admin", "*")
    node = user_keys(iam, "flannel", "ec2:*")
    trust = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "ec2.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )
    role = iam.create_role(RoleName="flannel-node", AssumeRolePolicyDocument=trust)["Role"]
    iam.put_role_policy(RoleName="flannel-node", PolicyName="p", PolicyDocument=allow("ec2:*"))
    assumed = client("sts").assume_role(RoleArn=role["Arn"], RoleSessionName="node")[
        "Credentials"
    ]
    role_creds = {
        "AccessKeyId": assumed["AccessKeyId"],
        "SecretAccessKey": assumed["SecretAccessKey"],
        "Token": assumed["SessionToken"],
    }

    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock=args["vpc_cidr"])["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=args["subnet_cidr"])["Subnet"]["SubnetId"]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instances = []
    for ip in args["hosts"]:
        i = ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "PrivateIpAddress": ip}],
        )["Instances"][0]
        eni = i["NetworkInterfaces"][0]["NetworkInterfaceId"]
        instances.append({"ip": ip, "instance_id": i["InstanceId"], "eni": eni})
    other = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=args["other_ip"])[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    doomed = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=args["doomed_ip"])[
        "NetworkInterface"
    ]["NetworkInterfaceId"]

    main = ec2.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"][0]["RouteTableId"]
    tables = {"main": main}
    for name in ["assoc", "b", "c"]:
        tables[name] = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    assoc_id = ec2.associate_route_table(RouteTableId=tables["assoc"], SubnetId=subnet)[
        "AssociationId"
    ]
    for t in tables.values():
        ec2.create_route(RouteTableId=t, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        for key, eni in [
            ("inside_active", other),
            ("outside_active", other),
            ("inside_blackhole", doomed),
            ("outside_blackhole", doomed),
        ]:
            ec2.create_route(RouteTableId=t, DestinationCidrBlock=args[key], NetworkInterfaceId=eni)
    # The target of the *_blackhole routes goes away: they become blackholes, as on AWS.
    ec2.delete_network_interface(NetworkInterfaceId=doomed)

    # From now on every request must carry a valid signature of a known key.
    req = urllib.request.Request(
        ENDPOINT + "/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req).read()
    return {
        "admin": admin,
        "node": node,
        "role": {"name": "flannel-node", "credentials": role_creds},
        "vpc": vpc,
        "subnet": subnet,
        "igw": igw,
        "instances": instances,
        "other_eni": other,
        "doomed_eni": doomed,
        "tables": tables,
        "assoc_id": assoc_id,
    }


def dump():
    ec2 = client("ec2")
    tables = {}
    for t in ec2.describe_route_tables()["RouteTables"]:
        routes = []
        for r in t["Routes"]:
            if "DestinationCidrBlock" not in r:
                continue
            routes.append(
                {
                    "dest": r["DestinationCidrBlock"],
                    "target": r.get("NetworkInterfaceId") or r.get("GatewayId") or "",
                    "state": r.get("State", ""),
                }
            )
        tables[t["RouteTableId"]] = sorted(routes, key=lambda r: r["dest"])
    enis = {}
    for n in ec2.describe_network_interfaces()["NetworkInterfaces"]:
        attr = ec2.describe_network_interface_attribute(
            NetworkInterfaceId=n["NetworkInterfaceId"], Attribute="sourceDestCheck"
        )
        enis[n["NetworkInterfaceId"]] = {"source_dest_check": attr["SourceDestCheck"]["Value"]}
    return {"tables": tables, "enis": enis}


def call(service, method, kwargs):
    out = getattr(client(service), method)(**kwargs)
    out.pop("ResponseMetadata", None)
    return out


def main():
    cmd = sys.argv[1]
    if cmd == "setup":
        out = setup(json.loads(sys.argv[2]))
    elif cmd == "dump":
        out = dump()
    elif cmd == "call":
        out = call(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
