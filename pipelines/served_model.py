"""The code MLflow runs to build a registered version's pyfunc model (models-from-code).

A version stores this file, the project's code and the model bundle as data; no pickled object,
so loading a version never unpickles what the artifact store holds.
"""

from mlflow.models import set_model

from pipelines.pyfunc_model import SiameseBundleModel

set_model(SiameseBundleModel())
