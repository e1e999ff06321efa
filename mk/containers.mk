# Container targets, included from the main Makefile (which defines PY, VENV and the
# `venv` target: the wheelhouse is built with the venv's pip, so a fresh clone's
# `make image` creates the venv first).
#   make image            local base + wheelhouse + zkv:dev (no registry needed)
#   make compose-up       2 brokers + 2 shards x 3 replicas via docker-compose (v1 CLI)
#   make compose-down     stop and remove them, volumes included
#   make compose-keys     Curve keys for the compose cluster in compose/keys (once)
#   make compose-up-secure  the same cluster with Curve on every socket (keys mounted ro)
#   make stack-keys       keys for the Swarm stack in compose/keys (spares s0r3/s1r3 too)
#   make stack-deploy     docker stack deploy of the secure stack (Swarm, hosts labelled)
#   make stack-rm         docker stack rm (volumes stay on their hosts)
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

COMPOSE_SECURE_FILE ?= compose/docker-compose.secure.yml
COMPOSE_KEYS ?= compose/keys
# Each broker certificate names the endpoints it serves (in-network and published), so
# a client or node connecting to several brokers knows which key each must present.
COMPOSE_BROKERS ?= broker0=tcp://broker0:5555;tcp://broker0:5556;tcp://broker0:5557;tcp://127.0.0.1:5555,broker1=tcp://broker1:5555;tcp://broker1:5556;tcp://broker1:5557;tcp://127.0.0.1:5565

# The Swarm stack (compose/README.md): brokers are published in host mode on the hosts
# labelled zkv.broker0 / zkv.broker1, so their certificates list those endpoints too
# (clients name a broker by its host); and it has spare node identities (--replicas 4:
# s0r3, s1r3) for replace-replica.
STACK_NAME ?= zkv
STACK_BROKER0_HOST ?= 127.0.0.1
STACK_BROKER1_HOST ?= 127.0.0.1
STACK_BROKERS ?= broker0=tcp://broker0:5555;tcp://broker0:5556;tcp://broker0:5557;tcp://127.0.0.1:5555;tcp://$(STACK_BROKER0_HOST):5555,broker1=tcp://broker1:5555;tcp://broker1:5556;tcp://broker1:5557;tcp://127.0.0.1:5565;tcp://$(STACK_BROKER1_HOST):5565
STACK_FILES ?= -c compose/docker-compose.yml -c compose/docker-stack.secure.yml

.PHONY: base-image wheelhouse image compose-up compose-down compose-ps test-containers \
	compose-keys compose-up-secure stack-keys stack-deploy stack-rm

base-image:
	ZKV_BASE_IMAGE=$(ZKV_BASE_IMAGE) compose/build-base.sh

wheelhouse: venv
	PY=$(PY) compose/build-wheelhouse.sh

image: base-image wheelhouse
	$(DOCKER) build --build-arg BASE_IMAGE=$(ZKV_IMAGE_BASE) -t $(ZKV_IMAGE) -f compose/Dockerfile .

compose-up: image
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) up -d

compose-keys: venv
	$(VENV)/bin/zkv keys generate $(COMPOSE_KEYS) --shards 2 --replicas 3 --brokers '$(COMPOSE_BROKERS)'

compose-up-secure: image compose-keys
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -f $(COMPOSE_SECURE_FILE) -p $(COMPOSE_PROJECT) up -d

stack-keys: venv
	$(VENV)/bin/zkv keys generate $(COMPOSE_KEYS) --shards 2 --replicas 4 --brokers '$(STACK_BROKERS)'

stack-deploy: stack-keys
	ZKV_STACK_KEYS=$(abspath $(COMPOSE_KEYS)) \
	  $(DOCKER) stack deploy --resolve-image never $(STACK_FILES) $(STACK_NAME)

stack-rm:
	$(DOCKER) stack rm $(STACK_NAME)

compose-down:
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) down -v --remove-orphans -t 2

compose-ps:
	$(DOCKER_COMPOSE) -f $(COMPOSE_FILE) -p $(COMPOSE_PROJECT) ps

test-containers:
	$(PY) -m pytest -m containers tests/containers
