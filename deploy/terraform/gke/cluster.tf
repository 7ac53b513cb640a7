resource "google_container_cluster" "main" {
  name     = var.name
  location = var.region # regional control plane; node pools choose their zones
  # checkov:skip=CKV_GCP_12: Dataplane V2 (ADVANCED_DATAPATH) enforces NetworkPolicy; the network_policy block is Calico's and conflicts with it
  # checkov:skip=CKV_GCP_69: the GKE metadata server is on in every node pool (workload_metadata_config); the default pool is removed
  # checkov:skip=CKV_GCP_65: Google Groups for RBAC needs a Workspace domain; add authenticator_groups_config if you have one

  network         = google_compute_network.main.id
  subnetwork      = google_compute_subnetwork.main.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Node pools are managed below; the default one is removed at once.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  release_channel {
    channel = "REGULAR"
  }
  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.0/28"
  }
  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block = cidr_blocks.value
      }
    }
  }
  # NetworkPolicy (the chart's) is enforced by Dataplane V2.
  datapath_provider = "ADVANCED_DATAPATH"
  addons_config {
    gcp_filestore_csi_driver_config {
      enabled = true
    }
    http_load_balancing {
      disabled = false
    }
  }
  enable_intranode_visibility = true
  enable_shielded_nodes       = true
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }
  resource_labels = var.labels
}

# The API, Redis, KEDA and system pods: small CPU nodes.
resource "google_container_node_pool" "system" {
  name     = "system"
  cluster  = google_container_cluster.main.id
  location = var.region
  autoscaling {
    min_node_count = 1
    max_node_count = 3
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = "e2-standard-4"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.node.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = var.labels
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# The workers: GPU nodes from zero, time-shared between `gpu_shared_clients` workers each.
resource "google_container_node_pool" "gpu" {
  name           = "gpu"
  cluster        = google_container_cluster.main.id
  location       = var.region
  node_locations = var.zones
  autoscaling {
    total_min_node_count = 0 # scale to zero: KEDA takes the workers to zero, the autoscaler the nodes
    total_max_node_count = var.gpu_max_nodes
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = var.gpu_machine_type
    image_type      = "COS_CONTAINERD"
    spot            = var.gpu_spot
    service_account = google_service_account.node.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = var.labels
    guest_accelerator {
      type  = var.gpu_type
      count = var.gpu_count
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
      dynamic "gpu_sharing_config" {
        for_each = var.gpu_shared_clients > 1 ? [1] : []
        content {
          gpu_sharing_strategy       = "TIME_SHARING"
          max_shared_clients_per_gpu = var.gpu_shared_clients
        }
      }
    }
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}
