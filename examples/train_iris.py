"""Train an iris classifier with scikit-learn and save what `tensorgate package` takes:

    .venv/bin/python examples/train_iris.py OUT      # OUT/model.joblib and OUT/train.npy (training rows)
"""

import sys
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/iris")
out.mkdir(parents=True, exist_ok=True)
features, labels = load_iris(return_X_y=True)
joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), out / "model.joblib")
np.save(out / "train.npy", features.astype(np.float32))
print(f"wrote {out / 'model.joblib'} and {out / 'train.npy'}")
