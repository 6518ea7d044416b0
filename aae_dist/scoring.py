"""Scores for clusterings and classifiers, and the simple baselines every AAE figure stands beside
(k-means on raw pixels, logistic regression on the same labelled samples).  numpy in, floats out."""

from __future__ import annotations

import numpy as np

# which baseline each metric stands beside (keys of summary.json["baselines"])
BASELINE_OF = {
    "cluster_error": "kmeans_cluster_error",
    "cluster_error_majority": "kmeans_cluster_error_majority",
    "clusters_used": "kmeans_clusters_used",
    "classify_error": "logistic_classify_error",
}


def cluster_scores(pool_cluster: np.ndarray, pool_conf: np.ndarray, pool_labels: np.ndarray,
                   test_cluster: np.ndarray, test_labels: np.ndarray, k: int) -> dict[str, float]:
    """Clustering error two ways, and how the clusters are used.

    cluster_error (the paper's protocol): each cluster takes the label of its most confident member
    of the labelling pool, so only k labels are used; clusters with no member count as wrong.
    cluster_error_majority: each cluster takes the majority label of its pool members (lenient)."""
    paper = np.full(k, -1)
    majority = np.full(k, -1)
    for c in range(k):
        members = np.flatnonzero(pool_cluster == c)
        if len(members):
            paper[c] = pool_labels[members[np.argmax(pool_conf[members])]]
            majority[c] = np.bincount(pool_labels[members]).argmax()
    hist = np.bincount(test_cluster, minlength=k) / max(1, len(test_cluster))
    nz = hist[hist > 0]
    return {
        "cluster_error": float(np.mean(paper[test_cluster] != test_labels)),
        "cluster_error_majority": float(np.mean(majority[test_cluster] != test_labels)),
        "clusters_used": int(np.sum(hist >= 0.01)),  # clusters holding at least 1% of the test set
        "cluster_entropy": float(-(nz * np.log(nz)).sum()),  # nats; log(k) when all are used equally
    }


def kmeans_baseline(x_pool: np.ndarray, y_pool: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int,
                    seed: int = 0) -> dict[str, float]:
    """k-means on raw pixels with the same k, scored like the AAE (confidence: nearness to the centroid)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x_pool)
    dist = km.transform(x_pool)[np.arange(len(x_pool)), km.labels_]
    s = cluster_scores(km.labels_, -dist, y_pool, km.predict(x_test), y_test, k)
    return {f"kmeans_{key}": v for key, v in s.items()}


def logistic_baseline(x_labelled: np.ndarray, y_labelled: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Logistic regression on exactly the labelled samples the run used."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(x_labelled, y_labelled)
    return {"logistic_classify_error": float(np.mean(clf.predict(x_test) != y_test)), "labelled_samples": int(len(y_labelled))}
