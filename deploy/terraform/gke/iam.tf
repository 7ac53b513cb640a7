# Seed 002's accounts: an admin account Terraform impersonates (Token Creator for the named people), and a
# least-privilege node account the GPU nodes and the sdserve pods (through Workload Identity) run as.

resource "google_service_account_iam_member" "admin_token_creator" {
  for_each           = var.admin_service_account == null ? toset([]) : toset(var.admin_members)
  service_account_id = "projects/${var.project_id}/serviceAccounts/${var.admin_service_account}"
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = each.value
}

resource "google_service_account" "node" {
  account_id   = "${var.name}-node"
  display_name = "sdserve GKE nodes and pods"
}

# What a GKE node needs and nothing more: write logs and metrics, read images from Artifact Registry.
resource "google_project_iam_member" "node" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/artifactregistry.reader",
  ])
  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.node.email}"
}

# The pods' Kubernetes service account acts as the node account (annotation iam.gke.io/gcp-service-account).
resource "google_service_account_iam_member" "workload_identity" {
  service_account_id = google_service_account.node.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.name}]"
}
