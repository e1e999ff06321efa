# Container targets, included from the main Makefile (which defines PY, VENV and the
# `venv` target: the wheelhouse is built with the venv's pip, so a fresh clone's
# `make image` creates the venv first).
#   make image            local base + wheelhouse + zkv:dev (no registry needed)
#   make compose-up       2 brokers + 2 shards x 3 replicas via docker-compose (v1 CLI)
#   make compose-down     stop and remove them, volumes included
#   make test-containers  the testcontainers suite (tests/containers)

PY ?= .venv/bin/python
VENV ?= .venv
DOCKER ?= docker
DOCKER_COMPOSE ?= docker-compose
ZKV_IMAGE ?= zkv:dev
ZKV_BASE_IMAGE ?= zkv-base:bookworm
COMPOSE_FILE ?= compose/docker-compose.yml
COMPOSE_PROJECT ?= zkv

# Build on python:3.11-slim when it is already present locally (users with a registry),
# otherwise on the debootstrapped base; both give the same venv at /opt/zkv.
ZKV_IMAGE_BASE ?= $(shell $(DOCKER) image inspect python:3.11-slim >/dev/null 2>&1 \
	&& echo python:3.11-slim || echo $(ZKV_BASE_IMAGE))

.PHONY: base-image wheelhouse image compose-up compose-down compose-ps test-containers

base-image:
	ZKV_BASE_IMAGE=$(ZKV_BASE_IMAGE) compose/build-base.sh

wheelhouse: venv
	PY=$(PY) compose/build-wheelhouse.sh

image: base-image wheelhouse
	$(DOCKER) build --build-arg BASE_IMAGE=$(ZKV_IMAGE_BASE) -t $(ZKV_IMAGE) -f compose/Dockerfile .

compose-up: image
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) up -d

compose-down:
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) down -v --remove-orphans -t 2

compose-ps:
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) ps

test-containers:
	$(PY) -m pytest -m containers tests/containers
