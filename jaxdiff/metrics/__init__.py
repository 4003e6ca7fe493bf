"""Sample-quality metrics (FID on an MNIST classifier's features, conditional accuracy, class
histogram, precision / recall, pixel statistics, digit attributes) and likelihood (bits/dim from
the variational bound)."""

from jaxdiff.metrics.classifier import (MnistClassifier, classifier_accuracy, classifier_features,
                                        classifier_logits, classify, init_classifier,
                                        load_classifier, save_classifier, train_classifier)
from jaxdiff.metrics.coverage import precision_recall
from jaxdiff.metrics.digit_attributes import (bin_values, binning_values, fit_thresholds,
                                              measure_attributes)
from jaxdiff.metrics.fid import (class_histogram, conditional_accuracy, feature_statistics,
                                 fid_from_features, frechet_distance)
from jaxdiff.metrics.likelihood import (VLB_VARIANCE_TYPES, VLBTerms, approx_standard_normal_cdf,
                                        bits_per_dim, discretized_gaussian_log_likelihood,
                                        normal_kl, prior_bpd, vlb_terms)
from jaxdiff.metrics.pixels import pixel_histogram_distance, pixel_statistics

__all__ = ["MnistClassifier", "classifier_accuracy", "classifier_features", "classifier_logits",
           "classify", "init_classifier", "load_classifier", "save_classifier", "train_classifier",
           "class_histogram", "conditional_accuracy", "feature_statistics", "fid_from_features",
           "frechet_distance", "VLB_VARIANCE_TYPES", "VLBTerms", "approx_standard_normal_cdf",
           "bits_per_dim", "discretized_gaussian_log_likelihood", "normal_kl", "prior_bpd",
           "vlb_terms", "precision_recall", "pixel_statistics", "pixel_histogram_distance",
           "measure_attributes", "binning_values", "fit_thresholds", "bin_values"]
