"""Package a model for SageMaker and create the model, the endpoint config and the endpoint (boto3).

    python deploy/sagemaker/endpoint.py package models/sd15 model.tar.gz
    python deploy/sagemaker/endpoint.py create --name sdserve --image ACCOUNT.dkr.ecr.REGION.amazonaws.com/sdserve:0.1.0 \
        --model-data s3://BUCKET/models/sd15.tar.gz --role arn:aws:iam::ACCOUNT:role/sdserve-sagemaker \
        --images s3://BUCKET/images [--async-output s3://BUCKET/async] [--instance-type ml.g5.xlarge] [--wait]

model.tar.gz holds the model at its top level, as SageMaker extracts it to /opt/ml/model: a diffusers folder's
contents (model_index.json, unet/, vae/, ...) or one .safetensors checkpoint. The container (deploy/Dockerfile,
run as `serve`) finds either there.

Real time: /invocations answers within SageMaker's 60 s limit. Asynchronous (--async-output): SageMaker queues
requests from S3, calls the same /invocations, and writes each answer to the output path (jobs up to an hour;
the endpoint can scale to zero). Either way the images also go to --images (the container's S3 store), and the
answers carry their s3:// locations.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path
from typing import Any


def package(model: Path, output: Path) -> Path:
    """model.tar.gz with the model at the top level: a diffusers folder's contents, or one checkpoint file."""
    if model.is_dir():
        if not (model / "model_index.json").is_file():
            raise SystemExit(f"{model}: not a diffusers folder (no model_index.json)")
        members = sorted(model.iterdir())
    elif model.suffix == ".safetensors":
        members = [model]
    else:
        raise SystemExit(f"{model}: give a diffusers folder or a .safetensors file")
    with tarfile.open(output, "w:gz") as archive:
        for member in members:
            archive.add(member, arcname=member.name)
    return output


def requests(name: str, image: str, model_data: str, role: str, images: str, region: str,
             instance_type: str = "ml.g5.xlarge", async_output: str | None = None,
             models_env: str | None = None) -> dict[str, dict[str, Any]]:
    """The CreateModel, CreateEndpointConfig and CreateEndpoint requests."""
    environment = {
        # s3://bucket/prefix: the container stores every image there and answers with its location.
        "SDSERVE_STORAGE": f"{images.rstrip('/')}?region={region}",
        "SDSERVE_SAGEMAKER": "1",
        "SDSERVE_DATA_DIR": "/tmp/sdserve",
    }
    if models_env:
        environment["SDSERVE_MODELS"] = models_env
    variant: dict[str, Any] = {
        "VariantName": "main", "ModelName": name, "InstanceType": instance_type, "InitialInstanceCount": 1,
        # Loading a model from /opt/ml/model takes a while on a cold instance.
        "ContainerStartupHealthCheckTimeoutInSeconds": 600, "ModelDataDownloadTimeoutInSeconds": 1200,
    }
    config: dict[str, Any] = {"EndpointConfigName": name, "ProductionVariants": [variant]}
    if async_output:
        base = async_output.rstrip("/")
        config["AsyncInferenceConfig"] = {
            "OutputConfig": {"S3OutputPath": f"{base}/output", "S3FailurePath": f"{base}/failure"},
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
        }
    return {
        "create_model": {"ModelName": name, "ExecutionRoleArn": role, "PrimaryContainer": {
            "Image": image, "ModelDataUrl": model_data, "Environment": environment}},
        "create_endpoint_config": config,
        "create_endpoint": {"EndpointName": name, "EndpointConfigName": name},
    }


def create(calls: dict[str, dict[str, Any]], region: str, wait: bool) -> None:
    import boto3

    client = boto3.client("sagemaker", region_name=region)
    for operation, params in calls.items():
        print(f"{operation}: {params.get('ModelName') or params.get('EndpointConfigName') or params['EndpointName']}")
        getattr(client, operation)(**params)
    if wait:
        client.get_waiter("endpoint_in_service").wait(EndpointName=calls["create_endpoint"]["EndpointName"])
        print("InService")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("package", help="make model.tar.gz from a diffusers folder or a .safetensors file")
    pack.add_argument("model", type=Path)
    pack.add_argument("output", type=Path)
    make = commands.add_parser("create", help="create the model, the endpoint config and the endpoint")
    make.add_argument("--name", required=True)
    make.add_argument("--image", required=True, help="the sdserve image in ECR")
    make.add_argument("--model-data", required=True, help="s3:// URL of model.tar.gz")
    make.add_argument("--role", required=True, help="execution role: reads the model, writes --images")
    make.add_argument("--images", required=True, help="s3://bucket/prefix for the images")
    make.add_argument("--instance-type", default="ml.g5.xlarge")
    make.add_argument("--async-output", help="s3://bucket/prefix: an asynchronous endpoint writing answers there")
    make.add_argument("--models", help="SDSERVE_MODELS, when the archive holds several models")
    make.add_argument("--region")
    make.add_argument("--wait", action="store_true", help="until the endpoint is InService")
    args = parser.parse_args()
    if args.command == "package":
        print(package(args.model, args.output))
    else:
        import boto3

        region = args.region or boto3.session.Session().region_name
        if not region:
            raise SystemExit("no AWS region: pass --region or set AWS_REGION")
        create(requests(args.name, args.image, args.model_data, args.role, args.images, region, args.instance_type,
                        args.async_output, args.models), region, args.wait)


if __name__ == "__main__":
    main()
