# Helix app-instance image: a stock Debian 12 AMI plus the agent (helix-monitor-c.service) and,
# by default, the sample app, all installed by deploy/ami/bake.sh.
#
#   packer init deploy/ami/helix-app.pkr.hcl
#   packer build -var region=eu-west-1 deploy/ami/helix-app.pkr.hcl
#
# The project is shipped as `git archive` of HEAD (committed files only, no venv, no local state),
# made on the machine running Packer. Use the resulting AMI id as HELIX_EC2_AMI (or in the launch
# template named by HELIX_EC2_LAUNCH_TEMPLATE). Instances get their settings at boot from the
# #cloud-config user data ControllerASG renders (/etc/helix/helix.env).
#
# For Ubuntu 24.04 instead: -var 'source_ami_name=ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*'
#   -var 'source_ami_owners=["099720109477"]' -var ssh_username=ubuntu

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.micro"
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty: the default VPC."
}

variable "source_ami_name" {
  type    = string
  default = "debian-12-amd64-*"
}

variable "source_ami_owners" {
  type        = list(string)
  default     = ["136693071363"]
  description = "Debian's official AWS account."
}

variable "ssh_username" {
  type    = string
  default = "admin"
}

variable "ami_name_prefix" {
  type    = string
  default = "helix-app"
}

variable "group" {
  type        = string
  default     = "helix"
  description = "The fleet (HELIX_GROUP) this image is for; tagged helix:group on the image."
}

variable "sample_app" {
  type        = bool
  default     = true
  description = "Install and enable helix-sample-app.service (the demo app on port 8080)."
}

variable "source_tarball" {
  type        = string
  default     = "/tmp/helix-src.tar.gz"
  description = "Where the local git archive of the project is written before upload."
}

locals {
  repo_root = abspath("${path.root}/../..")
  stamp     = formatdate("YYYYMMDD-hhmmss", timestamp())
  bake_args = var.sample_app ? "--role app --source /tmp/helix-src.tar.gz --sample-app" : "--role app --source /tmp/helix-src.tar.gz"
}

source "amazon-ebs" "helix_app" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id == "" ? null : var.subnet_id
  ssh_username  = var.ssh_username
  ami_name      = "${var.ami_name_prefix}-${local.stamp}"
  # Instances launched from the image require IMDSv2 (the agent speaks only IMDSv2).
  imds_support = "v2.0"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = var.source_ami_owners
    most_recent = true
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name          = "${var.ami_name_prefix}-${local.stamp}"
    "helix:group" = var.group
    "helix:role"  = "app-image"
  }
  run_tags = {
    Name          = "packer-${var.ami_name_prefix}"
    "helix:role"  = "image-build"
  }
}

build {
  sources = ["source.amazon-ebs.helix_app"]

  # The project as committed, made here and uploaded.
  provisioner "shell-local" {
    inline = ["git -C '${local.repo_root}' archive --format=tar.gz --prefix=helix/ -o '${var.source_tarball}' HEAD"]
  }

  provisioner "file" {
    source      = var.source_tarball
    destination = "/tmp/helix-src.tar.gz"
  }

  # bake.sh is uploaded on its own and run as root; it installs everything from the tarball.
  provisioner "shell" {
    script          = "${path.root}/bake.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }} ${local.bake_args}"
  }

  provisioner "shell" {
    inline = [
      "rm -f /tmp/helix-src.tar.gz",
      # A fresh cloud-init run on every instance launched from the image.
      "sudo cloud-init clean --logs",
    ]
  }
}
