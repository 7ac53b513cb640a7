variable "project_id" {
  description = "GCP project to create everything in"
  type        = string
}

variable "region" {
  description = "Region of the cluster, the bucket and Filestore"
  type        = string
  default     = "us-central1"
}

variable "zones" {
  description = "Zones for the GPU node pool (where the accelerator is offered); one zone makes a zonal pool"
  type        = list(string)
  default     = ["us-central1-a"]
}

variable "name" {
  description = "Prefix of every resource name"
  type        = string
  default     = "sdserve"
}

variable "admin_service_account" {
  description = "Service account Terraform impersonates (needs roles to create the resources below); null: your own credentials"
  type        = string
  default     = null
}

variable "admin_members" {
  description = "Principals allowed to impersonate the admin service account (Token Creator), e.g. user:you@example.com"
  type        = list(string)
  default     = []
}

variable "master_authorized_cidrs" {
  description = "CIDR blocks that may reach the cluster's control plane"
  type        = list(string)
  default     = []
}

variable "gpu_type" {
  description = "Accelerator type of the GPU pool, e.g. nvidia-l4, nvidia-tesla-t4, nvidia-a100-80gb"
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_count" {
  description = "GPUs per node"
  type        = number
  default     = 1
}

variable "gpu_machine_type" {
  description = "Machine type of the GPU pool (must fit the accelerator: g2-standard-8 for one L4)"
  type        = string
  default     = "g2-standard-8"
}

variable "gpu_max_nodes" {
  description = "Most GPU nodes per zone the autoscaler may create"
  type        = number
  default     = 4
}

variable "gpu_shared_clients" {
  description = "Workers per GPU with GKE time-sharing (gpu_sharing_config); 1 disables sharing"
  type        = number
  default     = 2
}

variable "gpu_spot" {
  description = "Spot GPU nodes: cheaper, may be preempted (a preempted worker's jobs go back to the queue)"
  type        = bool
  default     = false
}

variable "filestore_tier" {
  description = "Filestore tier of the models volume"
  type        = string
  default     = "BASIC_HDD"
}

variable "filestore_capacity_gb" {
  description = "Filestore capacity (BASIC_HDD: at least 1024)"
  type        = number
  default     = 1024
}

variable "namespace" {
  description = "Kubernetes namespace the Helm release goes to (for Workload Identity)"
  type        = string
  default     = "sdserve"
}

variable "labels" {
  description = "Labels on every resource that takes them"
  type        = map(string)
  default     = { app = "sdserve" }
}
