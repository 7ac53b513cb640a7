# Images: a private bucket. sdserve reaches it through GCS's S3 interoperability with an HMAC key of the node
# account (boto3 signs requests and presigned URLs with it).
resource "google_storage_bucket" "images" {
  name                        = "${var.project_id}-${var.name}-images"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = var.labels
  # checkov:skip=CKV_GCP_62: access logs of generated images are not kept; enable usage logs if you need them
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      age = 30
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket_iam_member" "images" {
  bucket = google_storage_bucket.images.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.node.email}"
}

resource "google_storage_hmac_key" "images" {
  service_account_email = google_service_account.node.email
}

# Models: Filestore (NFS), mounted ReadWriteMany by the chart's models PVC through the Filestore CSI driver
# (storageClass standard-rwx provisions its own instance). This instance is for a static PersistentVolume when
# you copy models once and keep them across releases: see the README.
resource "google_filestore_instance" "models" {
  name     = "${var.name}-models"
  location = var.zones[0]
  tier     = var.filestore_tier
  labels   = var.labels
  file_shares {
    name        = "models"
    capacity_gb = var.filestore_capacity_gb
  }
  networks {
    network = google_compute_network.main.name
    modes   = ["MODE_IPV4"]
  }
}
