# Bakes an AMI with ec2-agent installed and enabled, booting fresh.
#
#   python -m build --wheel --outdir dist .
#   packer build -var wheel=dist/ec2_agent-0.1.0-py3-none-any.whl \
#       -var region=eu-west-1 packaging/packer/ec2-agent.pkr.hcl
#
# Written for Packer >= 1.6.6 (HCL2, the amazon builder still built in, so no
# required_plugins block: 1.6 does not know it). Newer Packer needs
# `packer plugins install github.com/hashicorp/amazon` first.
#
# Defaults target Amazon Linux 2023 (python3.11 from dnf). For Debian/Ubuntu
# set source_ami_name/source_ami_owners/ssh_username; the provisioner installs
# python3-venv there instead.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "source_ami_name" {
  type        = string
  description = "Name filter for the base image (most recent match wins)."
  default     = "al2023-ami-2023.*-kernel-*-x86_64"
}

variable "source_ami_owners" {
  type    = list(string)
  default = ["amazon"]
}

variable "ssh_username" {
  type    = string
  default = "ec2-user"
}

variable "subnet_id" {
  type        = string
  description = "Where the build instance runs; empty lets Packer use the default VPC."
  default     = ""
}

variable "ami_name_prefix" {
  type    = string
  default = "ec2-agent"
}

variable "wheel" {
  type        = string
  description = "Path to the ec2-agent wheel to install (python -m build --wheel)."
  default     = "dist/ec2_agent-0.1.0-py3-none-any.whl"
}

# Baked defaults (/etc/ec2-agent/agent.yaml): the lowest config layer.
# Empty group/bucket leave them to user-data, the usual case.
variable "agent_group" {
  type    = string
  default = ""
}

variable "store_bucket" {
  type    = string
  default = ""
}

variable "store_prefix" {
  type    = string
  default = ""
}

variable "boot_deadline_s" {
  type    = number
  default = 120
}

variable "heal_mode" {
  type        = string
  description = "armed | dry-run | off; a new image starts in dry-run unless told otherwise."
  default     = "dry-run"
}

locals {
  stamp = formatdate("YYYYMMDDhhmmss", timestamp())
  # JSON strings are valid YAML scalars: jsonencode quotes whatever we are given.
  agent_yaml = <<-EOT
    # Baked by packer (ec2-agent.pkr.hcl). Layers: these defaults < user-data < bundle.
    %{if var.agent_group != ""}group: ${jsonencode(var.agent_group)}%{endif}
    %{if var.store_bucket != ""}store: {bucket: ${jsonencode(var.store_bucket)}, prefix: ${jsonencode(var.store_prefix)}}%{endif}
    boot: {deadline_s: ${var.boot_deadline_s}}
    heal: {mode: ${jsonencode(var.heal_mode)}}
    EOT
}

source "amazon-ebs" "ec2-agent" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  ssh_username  = var.ssh_username
  ami_name      = "${var.ami_name_prefix}-${local.stamp}"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = var.source_ami_owners
    most_recent = true
  }

  tags = {
    Name       = "${var.ami_name_prefix}-${local.stamp}"
    "ec2-agent" = "baked"
  }
}

build {
  sources = ["source.amazon-ebs.ec2-agent"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/ec2-agent/packaging"]
  }

  # The wheel, and packaging/ itself: install.sh and the systemd units.
  provisioner "file" {
    source      = var.wheel
    destination = "/tmp/ec2-agent/"
  }

  # Trailing slash: upload the directory's contents, not a directory named "..".
  provisioner "file" {
    source      = "${path.root}/../"
    destination = "/tmp/ec2-agent/packaging"
  }

  provisioner "shell" {
    environment_vars = [
      "AGENT_YAML_B64=${base64encode(local.agent_yaml)}",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo -E sh -eu '{{ .Path }}'"
    inline = [
      # A Python >= 3.10 with venv: Amazon Linux 2023 / RHEL 9 ship 3.9 as
      # python3, so install 3.11; Debian 12 / Ubuntu 22.04+ have it, minus venv.
      "if command -v dnf >/dev/null; then dnf install -y -q python3.11 python3.11-pip; PY=python3.11; else export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq python3 python3-venv; PY=python3; fi",
      "$PY -c 'import sys; assert sys.version_info >= (3, 10), sys.version'",
      # install.sh: venv at /opt/ec2-agent, /usr/local/bin/ec2-agent, units, default agent.yaml, daemon-reload, enable.
      "EC2_AGENT_PYTHON=$(command -v $PY) sh /tmp/ec2-agent/packaging/install.sh --enable --wheel /tmp/ec2-agent/$(basename ${var.wheel}) /",
      # The baked defaults: packer is the authority here, so overwrite.
      "install -d -m 0755 /etc/ec2-agent",
      "echo \"$AGENT_YAML_B64\" | base64 -d > /etc/ec2-agent/agent.yaml.new",
      "chmod 0644 /etc/ec2-agent/agent.yaml.new && mv /etc/ec2-agent/agent.yaml.new /etc/ec2-agent/agent.yaml",
      "/opt/ec2-agent/bin/ec2-agent --help >/dev/null",
      # Boot fresh: no agent state and no cloud-init instance state from this
      # build instance, so the first boot of every launch is a first boot.
      "rm -rf /var/lib/ec2-agent",
      "if command -v cloud-init >/dev/null; then cloud-init clean --logs --seed; fi",
      "rm -rf /tmp/ec2-agent",
    ]
  }
}
