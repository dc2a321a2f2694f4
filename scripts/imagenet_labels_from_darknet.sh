#!/bin/sh
# Writes ImageNet-1k class names in torchvision/TF index order (sorted WordNet ids), one per
# line, from Debian's `darknet` package data: its first 1000 lines of imagenet.labels.list
# (WordNet ids) and imagenet.shortnames.list (names) are the 1k classes in devkit order.
# usage: imagenet_labels_from_darknet.sh [DARKNET_DATA_DIR] > imagenet1k.names
set -eu
d=${1:-/usr/share/darknet/data}
head -n 1000 "$d/imagenet.labels.list" > /tmp/inet-wnids.$$
head -n 1000 "$d/imagenet.shortnames.list" > /tmp/inet-names.$$
paste /tmp/inet-wnids.$$ /tmp/inet-names.$$ | LC_ALL=C sort -k1,1 | cut -f2-
rm -f /tmp/inet-wnids.$$ /tmp/inet-names.$$
