"""The real servers from tests/realservers.py answer as the daemon's code will expect.

These also pin down which S3 features SeaweedFS supports (listed atop realservers.py).
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError
from realservers import S3Server, SqsServer

# -- S3 on SeaweedFS ---------------------------------------------------------------------------


def _error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


@pytest.fixture
def s3(s3_server: S3Server) -> Any:
    return s3_server.client()


def test_s3_rejects_a_wrong_secret(s3_server: S3Server) -> None:
    forged = S3Server(s3_server.endpoint_url, s3_server.access_key, "not-the-secret",
                      s3_server.region, s3_server.data_dir, 0.0).client()
    with pytest.raises(ClientError) as exc:
        forged.list_buckets()
    assert _error_code(exc) == "SignatureDoesNotMatch"


def test_s3_put_get_list_delete(s3: Any, s3_bucket: str) -> None:
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    etag = s3.put_object(Bucket=s3_bucket, Key="in/a b.txt", Body=b"hello",
                         Metadata={"origin": "test"})["ETag"]
    s3.put_object(Bucket=s3_bucket, Key="in/sub/c.txt", Body=b"c")
    got = s3.get_object(Bucket=s3_bucket, Key="in/a b.txt")
    assert got["Body"].read() == b"hello" and got["ETag"] == etag
    assert got["Metadata"] == {"origin": "test"}
    listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix="in/", Delimiter="/")
    assert [o["Key"] for o in listing["Contents"]] == ["in/a b.txt"]
    assert [p["Prefix"] for p in listing["CommonPrefixes"]] == ["in/sub/"]
    s3.delete_object(Bucket=s3_bucket, Key="in/a b.txt")
    with pytest.raises(ClientError) as exc:
        s3.head_object(Bucket=s3_bucket, Key="in/a b.txt")
    assert _error_code(exc) == "404"
    s3.delete_objects(Bucket=s3_bucket, Delete={"Objects": [{"Key": "in/sub/c.txt"}]})
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def test_s3_presigned_get(s3: Any, s3_bucket: str) -> None:
    s3.put_object(Bucket=s3_bucket, Key="p.txt", Body=b"presigned")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "p.txt"},
                                    ExpiresIn=60)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        assert response.read() == b"presigned"


def test_s3_put_to_a_missing_bucket_is_no_such_bucket(s3: Any) -> None:
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")
    assert _error_code(exc) == "NoSuchBucket"


def test_s3_copy_object_if_match(s3: Any, s3_bucket: str) -> None:
    etag = s3.put_object(Bucket=s3_bucket, Key="src", Body=b"payload")["ETag"]
    source = {"Bucket": s3_bucket, "Key": "src"}
    copied = s3.copy_object(Bucket=s3_bucket, Key="dst", CopySource=source, CopySourceIfMatch=etag)
    # SeaweedFS leaves the quotes off CopyObjectResult's ETag; AWS sends them.
    assert copied["CopyObjectResult"]["ETag"].strip('"') == etag.strip('"')
    assert s3.get_object(Bucket=s3_bucket, Key="dst")["Body"].read() == b"payload"
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket=s3_bucket, Key="dst2", CopySource=source,
                       CopySourceIfMatch='"0123456789abcdef0123456789abcdef"')
    assert _error_code(exc) == "PreconditionFailed"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=s3_bucket, Key="dst2")


def test_s3_put_if_none_match_refuses_to_overwrite(s3: Any, s3_bucket: str) -> None:
    s3.put_object(Bucket=s3_bucket, Key="once", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=s3_bucket, Key="once", Body=b"2", IfNoneMatch="*")
    assert _error_code(exc) == "PreconditionFailed"
    assert s3.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"1"


def test_s3_object_tagging(s3: Any, s3_bucket: str) -> None:
    s3.put_object(Bucket=s3_bucket, Key="t", Body=b"x", Tagging="scan=pending&watch=in")
    assert _tags(s3, s3_bucket, "t") == {"scan": "pending", "watch": "in"}
    s3.put_object_tagging(Bucket=s3_bucket, Key="t",
                          Tagging={"TagSet": [{"Key": "scan", "Value": "clean"}]})
    assert _tags(s3, s3_bucket, "t") == {"scan": "clean"}
    s3.copy_object(Bucket=s3_bucket, Key="kept", CopySource={"Bucket": s3_bucket, "Key": "t"})
    assert _tags(s3, s3_bucket, "kept") == {"scan": "clean"}
    s3.copy_object(Bucket=s3_bucket, Key="replaced", CopySource={"Bucket": s3_bucket, "Key": "t"},
                   TaggingDirective="REPLACE", Tagging="scan=infected")
    assert _tags(s3, s3_bucket, "replaced") == {"scan": "infected"}
    s3.delete_object_tagging(Bucket=s3_bucket, Key="t")
    assert _tags(s3, s3_bucket, "t") == {}


def _tags(s3: Any, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def test_s3_versioning(s3: Any, s3_bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    assert s3.get_bucket_versioning(Bucket=s3_bucket)["Status"] == "Enabled"
    first = s3.put_object(Bucket=s3_bucket, Key="v", Body=b"1")["VersionId"]
    second = s3.put_object(Bucket=s3_bucket, Key="v", Body=b"2")["VersionId"]
    assert first != second
    assert s3.get_object(Bucket=s3_bucket, Key="v", VersionId=first)["Body"].read() == b"1"
    assert s3.get_object(Bucket=s3_bucket, Key="v")["Body"].read() == b"2"
    marker = s3.delete_object(Bucket=s3_bucket, Key="v")
    assert marker["DeleteMarker"] is True
    with pytest.raises(ClientError):
        s3.head_object(Bucket=s3_bucket, Key="v")
    listing = s3.list_object_versions(Bucket=s3_bucket, Prefix="v")
    assert {v["VersionId"] for v in listing["Versions"]} == {first, second}
    assert [m["IsLatest"] for m in listing["DeleteMarkers"]] == [True]


def test_s3_multipart_upload_and_upload_part_copy(s3: Any, s3_bucket: str) -> None:
    part_bytes = 5 * 1024 * 1024  # the smallest part but the last, as on AWS
    body = b"a" * part_bytes + b"tail"
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    parts = [s3.upload_part(Bucket=s3_bucket, Key="big", UploadId=upload, PartNumber=n,
                            Body=chunk)["ETag"]
             for n, chunk in ((1, body[:part_bytes]), (2, body[part_bytes:]))]
    s3.complete_multipart_upload(Bucket=s3_bucket, Key="big", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(parts, 1)]})
    head = s3.head_object(Bucket=s3_bucket, Key="big")
    assert head["ContentLength"] == len(body) and head["ETag"].endswith('-2"')

    source = {"Bucket": s3_bucket, "Key": "big"}
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="copy")["UploadId"]
    ranges = ((1, f"bytes=0-{part_bytes - 1}"), (2, f"bytes={part_bytes}-{len(body) - 1}"))
    etags = [s3.upload_part_copy(Bucket=s3_bucket, Key="copy", UploadId=upload, PartNumber=n,
                                 CopySource=source, CopySourceRange=rng,
                                 CopySourceIfMatch=head["ETag"])["CopyPartResult"]["ETag"]
             for n, rng in ranges]
    with pytest.raises(ClientError) as exc:
        s3.upload_part_copy(Bucket=s3_bucket, Key="copy", UploadId=upload, PartNumber=3,
                            CopySource=source, CopySourceIfMatch='"stale"')
    assert _error_code(exc) == "PreconditionFailed"
    s3.complete_multipart_upload(Bucket=s3_bucket, Key="copy", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]})
    assert s3.get_object(Bucket=s3_bucket, Key="copy")["Body"].read() == body


def test_s3_abort_multipart_upload(s3: Any, s3_bucket: str) -> None:
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="gone")["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key="gone", UploadId=upload, PartNumber=1, Body=b"x")
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]] == ["gone"]
    s3.abort_multipart_upload(Bucket=s3_bucket, Key="gone", UploadId=upload)
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


# -- SQS on moto -------------------------------------------------------------------------------


def test_sqs_send_receive_delete(sqs_server: SqsServer, sqs_queue: str) -> None:
    sqs = sqs_server.client()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody='{"Records": []}',
                     MessageAttributes={"kind": {"DataType": "String", "StringValue": "s3"}})
    messages = sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                   MessageAttributeNames=["All"])["Messages"]
    assert [m["Body"] for m in messages] == ['{"Records": []}']
    assert messages[0]["MessageAttributes"]["kind"]["StringValue"] == "s3"
    sqs.delete_message(QueueUrl=sqs_queue, ReceiptHandle=messages[0]["ReceiptHandle"])
    attrs = sqs.get_queue_attributes(QueueUrl=sqs_queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_sqs_change_visibility_makes_a_message_receivable_again(
        sqs_server: SqsServer, sqs_queue: str) -> None:
    sqs = sqs_server.client()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody="m")
    first = sqs.receive_message(QueueUrl=sqs_queue, VisibilityTimeout=60, WaitTimeSeconds=0,
                                AttributeNames=["ApproximateReceiveCount"])["Messages"][0]
    assert "Messages" not in sqs.receive_message(QueueUrl=sqs_queue, WaitTimeSeconds=0)
    sqs.change_message_visibility(QueueUrl=sqs_queue, ReceiptHandle=first["ReceiptHandle"],
                                  VisibilityTimeout=0)
    again = sqs.receive_message(QueueUrl=sqs_queue, WaitTimeSeconds=0,
                                AttributeNames=["ApproximateReceiveCount"])["Messages"][0]
    assert again["MessageId"] == first["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"


def test_sqs_queues_are_fresh_per_test(sqs_server: SqsServer, sqs_queue: str) -> None:
    sqs = sqs_server.client()
    assert "Messages" not in sqs.receive_message(QueueUrl=sqs_queue, WaitTimeSeconds=0)
    assert sqs_queue.rsplit("/", 1)[1].startswith("t-test-sqs-queues-are-fresh-per-test-")
