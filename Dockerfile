# syntax=docker/dockerfile:1
# pacsflow's image: the official Airflow image, DCMTK (the receiver's dcmtk backend and echoscu), pacsflow
# and its exactly pinned requirements (requirements.txt pins apache-airflow to the image's 3.3.2, so pip
# never up- or downgrades Airflow itself). One image for every service of docker-compose.yaml.
FROM apache/airflow:3.3.2-python3.11 AS pacsflow

USER 0
# The data root: one volume shared by the receiver and the workers; patient data, service account only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o 50000 -g 0 -m 0770 /var/lib/pacsflow

# 50000: the official image's airflow user
USER 50000
COPY --chown=50000:0 requirements.txt /opt/pacsflow/requirements.txt
RUN pip install --no-cache-dir -r /opt/pacsflow/requirements.txt
COPY --chown=50000:0 pyproject.toml /opt/pacsflow/pyproject.toml
COPY --chown=50000:0 plugins /opt/pacsflow/plugins
# Installed as a distribution (the api-server lists the `dicom` connection type only then), its declared
# dependencies held to the pins installed above.
RUN pip install --no-cache-dir --constraint /opt/pacsflow/requirements.txt /opt/pacsflow
COPY --chown=50000:0 dags /opt/airflow/dags
COPY --chown=50000:0 include /opt/airflow/include
ENV PACSFLOW_DATA_ROOT=/var/lib/pacsflow
EXPOSE 8080 11113


# The sandbox PACS of `docker compose --profile sandbox`: Debian's Orthanc, as in the tests. Never expose it
# beyond the compose network.
FROM debian:bookworm-slim AS sandbox-pacs
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends orthanc dcmtk \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o orthanc -g orthanc -m 0700 /var/lib/orthanc/sandbox
COPY deploy/sandbox/orthanc.json /etc/pacsflow-sandbox/orthanc.json
# the Debian package's system user (its uid is chosen at install time)
# hadolint ignore=DL3066
USER orthanc
# Orthanc (DCMTK) disables Nagle's algorithm only when asked: small C-FIND exchanges are ~10x faster.
ENV TCP_NODELAY=1
EXPOSE 4242
CMD ["Orthanc", "/etc/pacsflow-sandbox/orthanc.json"]
