terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 8.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
  # Seed 002's pattern: run as the admin service account by impersonation, never with a downloaded key.
  impersonate_service_account = var.admin_service_account
}
