# One image, two roles:
#   docker run IMAGE                      -> tollway serve   (the sidecar, gRPC :50051;
#                                            with deploy/tollway.toml, HTTP ext_authz :50052)
#   docker run IMAGE webhook              -> tollway webhook (the companion, HTTP :8000)
# Configuration comes from a mounted tollway.toml (TOLLWAY_CONFIG) and the
# environment (TOLLWAY_REDIS_URL, Stripe secrets); nothing secret is baked in.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY webhook ./webhook
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home tollway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY deploy/tollway.toml /etc/tollway/tollway.toml
ENV TOLLWAY_CONFIG=/etc/tollway/tollway.toml \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["tollway", "health"]
ENTRYPOINT ["tollway"]
# The sidecar listens on every interface: a container's loopback is its own, so
# Envoy in another container could never reach 127.0.0.1:50051. Where Envoy shares
# the network namespace (a pod's containers, deploy/docker-compose.yml's
# network_mode), pass `serve --listen 127.0.0.1:50051` instead, as deploy/k8s/ and
# the compose file do. What guards the open port: the admin API takes admin tokens
# only, and deploy/tollway.toml sets [sidecar] require_service_token = true, so usage
# calls naming a customer by id need a service token too (Authorize, Check and calls
# by API key carry their own credential); [sidecar] tls_cert and tls_key put it on
# TLS, tls_client_ca requires client certificates (mutual TLS). HTTP ext_authz
# stays on 127.0.0.1:50052 (tollway.toml's http_listen): set
# TOLLWAY_HTTP_LISTEN=0.0.0.0:50052 for an Envoy elsewhere that asks over HTTP.
CMD ["serve", "--listen", "0.0.0.0:50051"]
