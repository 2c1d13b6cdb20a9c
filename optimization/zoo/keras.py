"""Built-in Keras (tf_keras) architectures: the digits demo CNN and a small MobileNetV2.

tf_keras is reached through the TensorFlow backend (the process has called
`prepare_worker_process()`); importing this module alone stays cheap.
"""
from __future__ import annotations


def digits_cnn(input_shape=(8, 8, 1), num_classes: int = 10):
    """Three conv-bn-relu blocks and a dense head, ~360k parameters (like the PyTorch one);
    outputs logits."""
    from optimization.backends.tensorflow import keras

    layers = keras.layers

    def conv_block(filters):
        return [layers.Conv2D(filters, 3, padding="same", use_bias=False),
                layers.BatchNormalization(), layers.ReLU()]

    return keras.Sequential(
        [keras.Input(input_shape), *conv_block(32), *conv_block(64), layers.MaxPooling2D(),
         *conv_block(128), layers.MaxPooling2D(), layers.Flatten(), layers.Dropout(0.2),
         layers.Dense(512, activation="relu"), layers.Dense(num_classes)],
        name="digits_cnn",
    )


def mobilenet_v2_small(input_shape=(32, 32, 3), num_classes: int = 10):
    """keras.applications MobileNetV2, width 0.35, untrained (no download), softmax head."""
    from optimization.backends.tensorflow import keras

    return keras.applications.MobileNetV2(input_shape=input_shape, alpha=0.35, weights=None,
                                          classes=num_classes)


ARCHITECTURES = {"digits_cnn": digits_cnn, "mobilenet_v2_035": mobilenet_v2_small}
