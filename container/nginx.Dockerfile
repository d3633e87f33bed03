# nginx from Debian's nginx-light package, the load balancer in front of the team stack's replicas:
#   podman build --build-arg BASE_IMAGE=localhost/siamese-base:bookworm -f container/nginx.Dockerfile \
#       -t localhost/siamese-nginx:bookworm container
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /usr/share/doc/* /usr/share/man/* \
    && rm -f /etc/nginx/sites-enabled/*
COPY nginx.conf /etc/nginx/nginx.conf
USER www-data
EXPOSE 8080
# No HTTP client in this image: bash asks /nginx-health over its /dev/tcp.
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /nginx-health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
CMD ["nginx", "-g", "daemon off;"]
