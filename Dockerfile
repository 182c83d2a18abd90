# syntax=docker/dockerfile:1
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
COPY packages ./packages
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY bridges ./bridges
RUN npm run build && npm prune --omit=dev

FROM node:24-bookworm-slim
# redis-server for the embedded default (no queue.redisUrl); unused when you point at your own Redis.
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/packages ./packages
COPY package.json ./
RUN mkdir -p /data && chown node:node /data
USER node
ENV TRIBRIDGE_CONFIG=/data/config.yaml TRIBRIDGE_REGISTRATION=/data/registration.yaml TRIBRIDGE__dataDir=/data/state
VOLUME /data
# appservice, MQTT, and metrics (when metrics.enabled with metrics.bind: 0.0.0.0)
EXPOSE 9993 1883 9464
# GET /ready on the configured appservice port: Redis, the homeserver and every connector up.
HEALTHCHECK --start-period=30s CMD ["node", "dist/src/index.js", "ready"]
ENTRYPOINT ["node", "dist/src/index.js"]
CMD ["start"]
