output "cluster_name" {
  value = google_container_cluster.main.name
}

output "get_credentials" {
  description = "Run this, then helm install"
  value       = "gcloud container clusters get-credentials ${google_container_cluster.main.name} --region ${var.region} --project ${var.project_id}"
}

output "images_bucket" {
  value = google_storage_bucket.images.name
}

output "hmac_access_id" {
  value = google_storage_hmac_key.images.access_id
}

output "hmac_secret" {
  value     = google_storage_hmac_key.images.secret
  sensitive = true
}

output "filestore_ip" {
  description = "NFS server of the models share (export /models)"
  value       = google_filestore_instance.models.networks[0].ip_addresses[0]
}

output "node_service_account" {
  value = google_service_account.node.email
}

# Helm values for deploy/helm/sdserve: terraform output -raw helm_values > gke-generated.yaml
output "helm_values" {
  value = yamlencode({
    storage = {
      url            = "s3://${google_storage_bucket.images.name}/images?endpoint_url=https://storage.googleapis.com&region=auto"
      existingSecret = "sdserve-gcs-hmac"
    }
    serviceAccount = {
      name        = var.name
      annotations = { "iam.gke.io/gcp-service-account" = google_service_account.node.email }
    }
    worker = {
      nodeSelector = merge(
        { "cloud.google.com/gke-accelerator" = var.gpu_type },
        var.gpu_shared_clients > 1 ? {
          "cloud.google.com/gke-gpu-sharing-strategy"       = "time-sharing"
          "cloud.google.com/gke-max-shared-clients-per-gpu" = tostring(var.gpu_shared_clients)
        } : {}
      )
    }
    modelStorage = { storageClass = "standard-rwx" }
    keda         = { maxReplicas = var.gpu_max_nodes * var.gpu_count * var.gpu_shared_clients }
  })
}
